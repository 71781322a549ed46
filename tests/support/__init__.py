"""Helpers the tests (and benches) share. Tests import them as `support.<module>` (`tests/` is on the
path through its conftest); benches add `tests/` to the path (`bench/common.py`).

stories.py        the stories260k run most stage tests build on: overrides, answers written in place
tiny.py           tiny random target configs for draft tests
drafts.py         drafts made and saved as the train stage makes them, untrained
lossless.py       the chi-square test of lossless sampling against the target's exact law
prefect.py        what the Prefect server recorded of a subflow's task runs
openai_server.py  a small OpenAI-compatible server over a real model, that can be told to fail
s3.py             a real S3 server (`rclone serve s3`) on 127.0.0.1
"""
