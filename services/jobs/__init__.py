"""Durable background jobs (`AGENTRT_BACKGROUND=queue`): procrastinate on the runtime's PostgreSQL.

Titles and summaries, and usage rollups, are queued by id after each turn (`defer_post_turn_work`), at most one
pending per conversation or per account and day, retried with growing waits, and run by `agentrt worker` processes
(`run_worker`). A job whose worker died is run again by another (`retry_stalled_jobs`, every minute), and a periodic
reconcile (`reconcile_post_turn_work`, every five minutes) queues whatever the database says is missing, so a process
that died between saving a turn and queueing its jobs loses nothing. Needs the `queue` extra.
"""

from agentrt.services.jobs._app import close_queue, jobs, listens, open_queue, queue_conninfo
from agentrt.services.jobs._defer import defer_post_turn_work, defer_summary
from agentrt.services.jobs._reconcile import ReconcileReport, reconcile_post_turn_work
from agentrt.services.jobs._tasks import QUEUES, conversation_summary, retry_stalled_jobs, usage_rollup
from agentrt.services.jobs._worker import WorkerStop, run_worker

__all__ = [
    'QUEUES',
    'ReconcileReport',
    'WorkerStop',
    'close_queue',
    'conversation_summary',
    'defer_post_turn_work',
    'defer_summary',
    'jobs',
    'listens',
    'open_queue',
    'queue_conninfo',
    'reconcile_post_turn_work',
    'retry_stalled_jobs',
    'run_worker',
    'usage_rollup',
]
