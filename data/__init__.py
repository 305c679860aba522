"""The datasets: each data/<name>/prepare.py writes data/<name>/<split>.json in the format of data/format.py."""
