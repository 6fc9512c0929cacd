import base64
import os
import threading

from villaged.storage import entropy


def test_slices_are_never_handed_out_twice() -> None:
    seen = {entropy.random_bytes(12) for _ in range(3 * entropy.POOL_BYTES // 12)}
    assert len(seen) == 3 * entropy.POOL_BYTES // 12  # spans several draws


def test_lengths_and_large_requests() -> None:
    assert len(entropy.random_bytes(1)) == 1
    assert len(entropy.random_bytes(entropy.POOL_BYTES + 1)) == entropy.POOL_BYTES + 1


def test_token_is_unpadded_urlsafe_base64_of_the_given_size() -> None:
    token = entropy.random_token(16)
    assert len(token) == 22
    assert len(base64.urlsafe_b64decode(token + "==")) == 16
    assert entropy.random_token(16) != token


def test_threads_get_distinct_slices() -> None:
    results: list[list[bytes]] = [[] for _ in range(4)]

    def work(out: list[bytes]) -> None:
        out.extend(entropy.random_bytes(12) for _ in range(2_000))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    every = [value for out in results for value in out]
    assert len(set(every)) == len(every) == 8_000


def test_a_forked_child_does_not_reuse_the_parents_draw() -> None:
    entropy.random_bytes(12)  # the parent now holds a draw
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.write(write_end, entropy.random_bytes(12))
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 12)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child != entropy.random_bytes(12)
