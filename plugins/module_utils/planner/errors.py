"""The planner's one error: the job cannot be planned as asked."""


class PlanError(Exception):
    """The job cannot be planned; str() holds the numbers and what would make it fit."""
