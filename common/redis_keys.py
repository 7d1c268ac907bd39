"""Every Redis key fairdiff writes, in one place.

Gateway and workers share Redis and nothing else, so a key spelled twice is a contract kept by
hand; here it is spelled once, and an operator can read the whole layout (for `redis-cli --scan`,
memory accounting or a migration) from one file. Templates are `str.format` patterns.
"""

from __future__ import annotations

PREFIX = "fairdiff"

# jobs (common/jobs.py)
JOB_KEY = PREFIX + ":job:{id}"  # hash: state, request, progress, result, error, owner, timings...
QUEUED_ZSET = PREFIX + ":queued:{queue}"  # job ids waiting, scored by enqueue time
JOBS_BY_KIND = PREFIX + ":jobs:{kind}"  # zset of ids by creation time, for listings
RUNNING_SET = PREFIX + ":running:{queue}"  # ids of running jobs: the recovery sweep reads only these
FINISHED_ZSET = PREFIX + ":finished"  # ids of finished jobs by finish time: the retention sweep's queue
ACTIVE_KEY = PREFIX + ":active:{owner}"  # set of an owner's unfinished job ids, for its concurrency cap
IDEMPOTENCY_KEY = PREFIX + ":idem:{scope}:{key}"  # Idempotency-Key -> job id, per tenant

# workers and models
MODEL_KEY = PREFIX + ":model:{base}"  # JSON ModelInfo a worker published for its base model
WORKER_KEY = PREFIX + ":worker:{queue}:{name}"  # heartbeat, expires when a worker stops
STATS_KEY = PREFIX + ":stats"  # hash of worker-side counters: field -> number, read by /metrics
BATCH_STATS_KEY = PREFIX + ":batch_stats"  # hash of shared-pass histograms and counters (common/batch_stats.py)

# per-caller state
LEDGER_PREFIX = PREFIX + ":ledger:"  # + scope:hash -> hash of delivered counts per class
RATE_KEY = PREFIX + ":rate:{scope}:{window}"  # request counter per tenant and minute

# webhooks (service/webhooks.py)
WEBHOOKS_PENDING = PREFIX + ":webhooks:pending"  # zset: job id -> when to look at it next
WEBHOOK_KEY = PREFIX + ":webhook:{id}"  # hash: url, events, attempts, state, last_status, last_error
WEBHOOK_LOCK_KEY = PREFIX + ":webhook:lock:{id}"  # one delivery attempt at a time per job
