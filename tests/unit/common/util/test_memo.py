"""ProcessMemo (common/util/memo.py): least recently used out by count and by weight, and usable in a forked child."""
from __future__ import annotations

import os

from common.util.memo import ProcessMemo


def test_memo_evicts_least_recently_used_by_count() -> None:
    memo: ProcessMemo[str] = ProcessMemo(capacity=2)
    memo.put("a", "1")
    memo.put("b", "2")
    assert memo.get("a") == "1"  # now b is the oldest
    memo.put("c", "3")
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == ("1", None, "3")


def test_memo_evicts_by_weight_and_refuses_what_cannot_fit() -> None:
    memo: ProcessMemo[bytes] = ProcessMemo(capacity=10, max_weight=10, weigh=len)
    memo.put("a", b"x" * 4)
    memo.put("b", b"x" * 4)
    memo.put("a", b"x" * 5)  # replacing counts the new weight only
    assert memo.weight == 9
    memo.put("c", b"x" * 3)
    assert memo.get("b") is None and memo.weight == 8
    memo.put("huge", b"x" * 11)
    assert memo.get("huge") is None and len(memo) == 2


def test_memo_works_in_a_child_forked_while_its_lock_was_held() -> None:
    memo: ProcessMemo[int] = ProcessMemo(capacity=4)
    memo.put("a", 1)
    with memo._lock:  # a parent thread inside the memo at the moment of fork
        pid = os.fork()
        if pid == 0:
            try:
                memo.put("b", 2)
                os._exit(0 if memo.get("a") == 1 and memo.get("b") == 2 else 1)
            except BaseException:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
