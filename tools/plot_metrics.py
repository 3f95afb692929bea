#!/usr/bin/env python3
"""Loss and throughput curves from metrics.jsonl files: tools/plot_metrics.py RUN/metrics.jsonl --out loss.png"""
import sys

from pldr_dist.train.plot import main

sys.exit(main())
