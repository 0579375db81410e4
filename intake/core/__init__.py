"""The base every other part stands on: settings, errors, domain models, ids, the policy file, and how to reach Redis. Imports nothing else from intake."""
