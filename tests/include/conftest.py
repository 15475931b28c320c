from tests.e2e.kube_world import engine, submitter  # noqa: F401 - the engine's and the trigger form's identities
