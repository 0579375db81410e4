"""intake: a secure chat-intake broker. Channels capture untrusted ideas; only a step-up-MFA
approval under policy promotes one into a task that scoped agent workers may run."""
