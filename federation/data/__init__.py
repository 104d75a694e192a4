"""The three real datasets of the fleet, with natural client splits (see DESIGN.md)."""
