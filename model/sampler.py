"""The text sample of each evaluation, generated from a copy of the weights on a thread while training goes on.
Trade-off: a second set of weights on the device and samples arriving a few steps late, for a loop never held up."""
from __future__ import annotations

import threading
from typing import Callable

import torch

from model.generate import sample
from model.gpt import GPT


class BackgroundSampler:
    """`submit(model, seed, done)` copies the weights (ordered after the step's kernels on the current stream) and
    returns; the sample is drawn from the copy, on a stream of its own, and handed to `done(text)` from the
    thread. The text depends only on the copied weights and the seed: the same as drawn in line. `background`
    False (the CPU, where a thread would only contend with training) draws it in line, in `submit`."""

    def __init__(self, model: GPT, decode: Callable[[list[int]], str], prompt_ids: list[int], n_tokens: int,
                 background: bool):
        self.decode, self.prompt_ids, self.n_tokens = decode, prompt_ids, n_tokens
        self.background = background
        self.copy: GPT | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.stream = torch.cuda.Stream() if background and next(model.parameters()).is_cuda else None

    def _weights(self, model: GPT) -> GPT:
        if self.copy is None:
            dev = next(model.parameters()).device
            # built on the device, its init drawn from a forked RNG: training's random streams do not move
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.device(dev):
                self.copy = GPT(model.config).eval()
            self.copy.requires_grad_(False)
        self.copy.stream_dtype = model.stream_dtype
        with torch.no_grad():
            for dst, src in zip(self.copy.parameters(), model.parameters(), strict=True):
                dst.copy_(src)
        return self.copy

    def _draw(self, model: GPT, seed: int, done: Callable[[str], None]) -> None:
        done(self.decode(list(sample(model, self.prompt_ids, self.n_tokens, top_k=50, seed=seed))))

    def submit(self, model: GPT, seed: int, done: Callable[[str], None]) -> None:
        self.wait()
        if not self.background:
            self._draw(model, seed, done)
            return
        copy = self._weights(model)
        ready = torch.cuda.Event() if self.stream is not None else None
        if ready is not None:
            ready.record()  # after the copies, on the training stream

        def run() -> None:
            try:
                if self.stream is None:
                    self._draw(copy, seed, done)
                    return
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(ready)
                    self._draw(copy, seed, done)
                # the generator queues one forward past its last token: done before the next copy overwrites
                self.stream.synchronize()
            except BaseException as e:  # raised again in the main thread, by wait()
                self.error = e

        self.thread = threading.Thread(target=run, name="eval-sample", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Until the sample in flight has been handed over; its error, if any, raised here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            e, self.error = self.error, None
            raise e
