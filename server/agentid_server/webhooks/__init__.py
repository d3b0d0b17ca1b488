"""Step-up notifications over HTTP: `[[step_up.notify]]` webhooks, signed as Standard Webhooks
do, delivered from a bounded queue with retries, never in the way of a StepUp or a Check.
What is sent, and when, is decided in ``domain/notices.py``; this package only carries it."""

from agentid_server.webhooks.delivery import Endpoint, WebhookNotifier
from agentid_server.webhooks.signing import load_secret, parse_secret, signature

__all__ = ["Endpoint", "WebhookNotifier", "load_secret", "parse_secret", "signature"]
