"""The email channel: an SMTP listener whose mail becomes ideas, with DKIM as provenance.

``message`` parses (structure only, attachments never opened), ``authenticity`` decides the
DKIM/DMARC verdict, ``listener`` runs aiosmtpd and captures, ``reply`` answers the sender.
"""
