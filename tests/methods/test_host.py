"""`host_tensor`: Python floats as a new tensor over a new array's memory."""

from __future__ import annotations

import threading

import pytest
import torch

from polytask.methods._host import host_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_host_tensor_is_torch_tensor_of_the_values_and_the_callers_own(dtype):
    like = torch.zeros(3, dtype=dtype)
    values = [0.1, 1 / 3, 2.0 ** -30]
    first = host_tensor(values, like)
    assert first.dtype == dtype and torch.equal(first, torch.tensor(values, dtype=dtype))  # the same rounding
    second = host_tensor([5.0, 6.0, 7.0], like)
    assert torch.equal(first, torch.tensor(values, dtype=dtype))  # a later call leaves the first answer alone
    assert torch.equal(second, torch.tensor([5.0, 6.0, 7.0], dtype=dtype))
    assert host_tensor([], like).shape == (0,)
    assert torch.equal(host_tensor([1.5], like), torch.tensor([1.5], dtype=dtype))
    second.mul_(2)  # the caller's own: writable, and shared with no other answer
    assert torch.equal(second, torch.tensor([10.0, 12.0, 14.0], dtype=dtype))
    assert torch.equal(host_tensor([5.0, 6.0, 7.0], like), torch.tensor([5.0, 6.0, 7.0], dtype=dtype))


def test_host_tensor_keeps_each_threads_writes_apart():
    like = torch.zeros(4, dtype=torch.float64)
    failures = []

    def work(offset: float) -> None:
        for k in range(2000):
            values = [offset + k, offset - k, offset * k, offset]
            if not torch.equal(host_tensor(values, like), torch.tensor(values, dtype=torch.float64)):
                failures.append(values)

    threads = [threading.Thread(target=work, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
