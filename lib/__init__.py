"""What the scripts share, and what a reader of the paper's code can skip:

    run.py         a training run around its steps: checkpoints saved and resumed, evaluations, the log, stops
    weights.py     every weight format (official .pth, minidetr checkpoints, transformers folders), the run
                   folder (ckpt.pt, best.pt, log.jsonl) and fine-tuning's transfer of weights
    inference.py   the one way a model runs over images (predict), and train.py's evaluation
    metrics.py     mAP as pycocotools computes it, and the training diagnostics
    processes.py   DDP, signals, threads, out of memory: how a run starts and ends on every rank
    draw.py        boxes, colours and figures for sample.py and tools/
"""
