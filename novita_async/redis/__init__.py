"""Many processes, one Novita account: a shared quota, journal and webhook relay in Redis.

``pip install 'novita-async[redis]'``. Built on redis-py's asyncio client, so
everything here is **asyncio only**: under trio the first call raises a
:class:`RuntimeError` saying so (the rest of novita_async runs on trio).

* :class:`RedisRateLimiter`: one images-per-minute quota and one 429 slow-down for
  every process using the same key (``AsyncNovita(rate_limiter=...)``).
* :class:`RedisJournal`: the batch journal, keyed by name, so a batch killed on one
  machine is finished on another without paying twice; a lease refuses a second
  live run.
* :class:`RedisWebhookRelay`: a webhook delivery reaching any replica reaches the
  replica waiting for that task (pub/sub).
"""

from ._journal import RedisJournal
from ._ratelimit import RedisAdmission, RedisRateLimiter, RedisUnavailableError
from ._relay import RedisWebhookRelay

__all__ = [
    "RedisAdmission",
    "RedisJournal",
    "RedisRateLimiter",
    "RedisUnavailableError",
    "RedisWebhookRelay",
]
