"""The three real datasets of the fleet, with natural client splits (docs/architecture.md, "Data")."""
