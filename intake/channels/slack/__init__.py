"""Slack transport: request verification and Block Kit rendering."""
