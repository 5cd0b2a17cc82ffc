"""Auto-reload: a payment started when a settlement leaves a workspace under its threshold.

store.py is the state machine in Postgres (settings, one row per reload, the in-flight guard, back-off
and disabling); gateway.py the interface to the payment provider; worker.py the control-plane loop that
starts due reloads and retries after back-off. The trigger itself is the balance watch (watch.py).
"""
