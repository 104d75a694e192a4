"""fedge's ServerApp (Flower Message API): `flwr run .` starts here."""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from federation.errors import FedgeError
    from server.loop import run_federation

    try:
        run_federation(grid, context.run_config, context.run_id)
    except FedgeError as exc:
        log(ERROR, "fedge: %s", exc)
        raise SystemExit(f"fedge: {exc}") from None
