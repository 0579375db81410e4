"""The RQ worker side of intake: workspaces, agent adapters and the gates a change must pass."""
