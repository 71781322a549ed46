"""Helpers the tests (and benches) share: the stories260k run they build on (`stories.py`), tiny random
model configs (`tiny.py`), and a real S3 server (`s3.py`). Tests import them as `support.<module>`
(`tests/` is on the path through its conftest); benches add `tests/` to the path (`bench/common.py`)."""
