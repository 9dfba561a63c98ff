"""Tools a policy may call in the middle of a multi-turn rollout: a calculator (`calculator.py`,
arithmetic parsed with `ast`, never `eval`) and a Python interpreter in a separate, limited
process (`sandbox.py`); `registry.py` names them and fixes the text format of a call
(`<tool name="calculator">47+6</tool>`) and of the observation returned to the policy.
"""
