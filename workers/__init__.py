"""The RQ worker side of intake.

- ``worker``: ``intake worker`` (an RQ SimpleWorker that runs only intake jobs);
- ``jobs``: what a job may be (one entry point, ``{task_id, token}``), checked before any call;
- ``entry``: that entry point;
- ``claim``: token, state, policy and scope checks and the atomic claim; settling a run;
- ``run``: one run (clone, agent, commit, gates, push, pull request) and ``heartbeat``;
- ``config``: worker settings; ``dev``: the embedded worker of ``intake serve --dev``;
- ``workspace``, ``agents``, ``gates``, ``forge``: the building blocks.
"""
