"""Feature-adaptation detectors: a frozen backbone plus a small trained adaptor (CFA, SuperSimpleNet)."""
