"""Scale-out on Ray Serve (`kvserve serve --replicas N`): engine replicas behind a cache-aware
router. Only this package imports Ray, and only when scale-out is asked for."""
