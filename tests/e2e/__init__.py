"""End-to-end tests: the installed twistd plugins as real processes on loopback."""
