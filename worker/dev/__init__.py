"""Development tooling shipped with the package: ``lipsync-worker demo`` and the throwaway Redis the
demo and the tests start."""
