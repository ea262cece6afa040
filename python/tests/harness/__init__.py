"""keel's test harness: hosts as network namespaces (:mod:`.netns`, with the
userspace :mod:`.shaper` where the kernel has no netem) and systemd in
``systemd-nspawn`` containers (:mod:`.nspawn`), with pytest fixtures in
:mod:`.plugin`. See README.md beside this file."""
