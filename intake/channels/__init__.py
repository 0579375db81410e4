"""The channels ideas arrive by. Each one authenticates its transport, normalises what it received into one draft and calls the one capture; nothing else in the broker is channel-specific."""
