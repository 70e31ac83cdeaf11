"""Benchmark what a long conversation costs everyone else: other streams' delays while long histories start.

Usage:
    python bench/history.py         # --rounds 2 --messages 1000 by default; about 2 minutes

Against the fake model of bench/model.py, 30 streams x 30 tokens/s run on app.py (pinned to one core)
for about 7 seconds, first alone and then while a request with a long history (--messages, as
human/ai pairs) starts every half second. The table shows the delay the server added to the 30
streams' tokens (p50, p99, max) both ways, for app.py, which sends the history to the model as
plain JSON, and for the typed variant (bench/typed_sdk.py), which hands it to the openai client's
typed conversion as app.py did before. Rounds alternate the two; the table shows the medians.
"""

import argparse
import asyncio
import os
import statistics

from run import CLIENT_CORE, SERVER_CORE, TWO_CORES, serving
from tokens import alternate, converse, load, model_server

VARIANTS = ("django", "typed")


def long_history(messages: int) -> dict[str, list[dict[str, object]]]:
    """A state of that many messages, human and ai in turn."""
    history: list[dict[str, object]] = []
    for n in range(messages // 2):
        history.append({"id": f"h{n}", "type": "human", "content": [{"type": "text", "text": f"question {n}"}]})
        history.append({"id": f"a{n}", "type": "ai", "content": f"answer {n}, in a few words", "tool_calls": []})
    return {"messages": history}


async def with_long_histories(port: int, messages: int) -> dict[str, float]:
    """The 30 x 30 load, while a long-history request starts every half second."""
    streams = asyncio.ensure_future(load(port, 30, 200, 1 / 30))
    index, started, state, ignored = 0, [], long_history(messages), list[float]()
    while not streams.done():
        order = f"tokens=1 pace=0 id=long{index}"
        started.append(asyncio.ensure_future(converse(port, order, ignored, state=state)))
        index += 1
        await asyncio.sleep(0.5)
    await asyncio.gather(*started)
    return {**streams.result(), "long requests": index}


def measure(variant: str, model_port: int, messages: int) -> dict[str, float]:
    env = {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"http://127.0.0.1:{model_port}/v1"}
    with serving(variant, **env) as server:
        asyncio.run(load(server.port, 8, 50, 0))  # warm up
        alone = asyncio.run(load(server.port, 30, 200, 1 / 30))
        busy = asyncio.run(with_long_histories(server.port, messages))
    return {f"alone {key}": alone[key] for key in ("p50", "p99", "max")} | {
        f"busy {key}": busy[key] for key in ("p50", "p99", "max", "long requests")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--messages", type=int, default=1000)
    options = parser.parse_args()
    if TWO_CORES:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})
    with model_server() as model_port:
        runs = alternate(options.rounds, VARIANTS, lambda variant: measure(variant, model_port, options.messages))
    medians = {v: {key: statistics.median(run[key] for run in runs[v]) for key in runs[v][0]} for v in VARIANTS}
    print(f"\nmedians of {options.rounds} rounds; server on core {SERVER_CORE}, model and clients on {CLIENT_CORE}")
    print(f"30 streams x 30 tokens/s, alone and while a {options.messages}-message history starts every 0.5 s\n")
    print(f"| {'added delay to the 30 streams, ms':<44} | {'django':>9} | {'typed':>9} | django/typed |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|--------------|")
    for key in medians["django"]:
        values = [medians[variant][key] for variant in VARIANTS]
        ratio = f"{values[0] / values[1]:.2f}" if values[1] else "-"
        print(f"| {key:<44} | {values[0]:>9.1f} | {values[1]:>9.1f} | {ratio:>12} |")


if __name__ == "__main__":
    main()
