"""Notifications: signed webhooks to a workspace's endpoint (signing.py), the events and their durable
delivery log in Postgres (events.py), the endpoint and its sealed secret (endpoints.py), and the
bounded worker that delivers them with retries (delivery.py)."""
