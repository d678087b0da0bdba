"""Training a collection's model: the policy (when, on how many points, which architecture), the job
(a server thread watching a child process) and the worker (the child process)."""
