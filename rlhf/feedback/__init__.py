"""Feedback on sampled responses for `rlhf label`: who ranks them and how scores become a ranking (`labelers`), an
AI judge (`judge`), and for `--by human` the local labeling page (`label_web`, with `label_web_page.html`) and its
append-only judgment log (`judgment_log`)."""
