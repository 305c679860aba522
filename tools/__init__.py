"""Scripts around a trained model, each run as `python tools/<name>.py --help`:

    eval.py        the report of a model on a split: per class, per error kind, after each decoder layer
    analyses.py    the paper's analyses drawn: the matching, the query slots (Fig. 7), curves, weights
    export.py      ONNX and transformers folders out
    bench.py       speed, memory and FLOPs
"""
