"""Request ids: a client's sane one is kept; a fresh one is 32 hex digits, never repeated
in a process, in a forked child or in another process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from batchd.request_log import request_id_from

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_a_sane_client_id_is_kept_and_any_other_replaced() -> None:
    assert request_id_from("abc-123") == "abc-123"
    for given in (None, "", "has space", "x" * 129, "naïve"):
        assert HEX32.fullmatch(request_id_from(given)), given


def test_fresh_ids_never_repeat_here_in_a_fork_or_in_another_process() -> None:
    here = [request_id_from(None) for _ in range(1000)]
    assert len(set(here)) == 1000
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child's next id, as the parent's next would be
        os.write(writer, request_id_from(None).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    forked = os.read(reader, 64).decode()
    os.close(reader)
    other = subprocess.run([sys.executable, "-c", "from batchd.request_log import "
                            "request_id_from; print(request_id_from(None))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    parent_next = request_id_from(None)
    ids = {*here, forked, other, parent_next}
    assert len(ids) == 1003
    assert all(HEX32.fullmatch(value) for value in ids)
    assert forked[:16] != parent_next[:16] and other[:16] != parent_next[:16]
