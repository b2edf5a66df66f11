"""Errors the workflow raises; their text is shown to people as it is, so it is Chinese."""

from __future__ import annotations


class WorkflowError(Exception):
    """A step that is not allowed now. ``str(err)`` says why, in Chinese."""


class IllegalTransition(WorkflowError):
    def __init__(self, number: str, status: str, action: str) -> None:
        from models.states import ACTION_ZH, STATUS_ZH

        self.status, self.action = status, action
        super().__init__(
            f"工单 {number} 当前状态为“{STATUS_ZH.get(status, status)}”，"
            f"不能{ACTION_ZH.get(action, action)}。"
        )


class IncompleteReply(WorkflowError):
    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__("办结答复不完整，缺少：" + "、".join(missing) + "。请补充后再提交。")


class PermissionDenied(WorkflowError):
    pass


class NotFound(WorkflowError):
    pass
