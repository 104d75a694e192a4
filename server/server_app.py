"""fedge's ServerApp (Flower Message API): `flwr run .` starts here."""

from __future__ import annotations

from logging import ERROR
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.status import FAILED, out_dir_of, write_status

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from federation.errors import FedgeError
    from server.loop import run_federation

    out = out_dir_of(context.run_config)
    try:
        run_federation(grid, context.run_config, context.run_id)
    except FedgeError as exc:
        log(ERROR, "fedge: %s", exc)
        _record_failure(out, str(exc))
        raise SystemExit(f"fedge: {exc}") from None
    except Exception as exc:  # a crash: still leave its reason in the run's folder, then re-raise
        _record_failure(out, f"{type(exc).__name__}: {exc}")
        raise


def _record_failure(out: Path | None, reason: str) -> None:
    """Leave the reason in the run's status.json (when the config names its folder); never mask
    the original error with one about the status file."""
    if out is None:
        return
    try:
        write_status(out, FAILED, error=reason)
    except OSError as exc:
        log(ERROR, "fedge: could not record the failure in %s: %s", out, exc)
