"""fedge-example-digits: a task, a device class and a scenario that live outside fedge.

- the task `digits` (`fedge_example_digits.task`): recognise handwritten digits (scikit-learn's
  copy of the UCI optical digits, 8x8 images) with a small pretrained encoder + LoRA + head;
- the device class `notepad` (an e-ink notepad with a stylus) and the scenario
  `digits-notepads`, both in `notepads.toml`.

Installed, it is found through the entry points its pyproject.toml declares:
`fedge simulate --scenario digits-notepads`.
"""

from pathlib import Path

SCENARIO_FILE = Path(__file__).with_name("notepads.toml")
