"""Untrusted text for every surface it reaches: normalisation and hidden-character markers (:mod:`.normalise`), terminal (:mod:`.terminal`), Slack mrkdwn (:mod:`.mrkdwn`) and HTML (:mod:`.html`)."""
