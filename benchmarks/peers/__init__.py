"""The project beside other engines (OpenVINO GenAI so far) on one checkpoint: ``python -m benchmarks.peers --help``."""
