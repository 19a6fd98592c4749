"""``uffd-wp-async``: userfaultfd asynchronous write-protect + ``PAGEMAP_SCAN`` (Linux 6.7+).

Theory of operation: every region is registered in userfaultfd WP mode on an fd opened with
``UFFD_FEATURE_WP_ASYNC`` and write-protected as a whole at start. A guest write to a protected
page faults once; with WP_ASYNC the kernel lifts the protection itself (about a microsecond, no
user thread, no message) and the page now counts as ``PAGE_IS_WRITTEN``. ``sync`` runs
``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`` over each region: it
returns the written runs and protects them again in the same page-table walk, so a racing
write shows up in this sync or the next (see ``pagemap``). Shared anonymous memory is shmem,
hence ``WP_HUGETLBFS_SHMEM``; ``WP_UNPOPULATED`` (when offered) makes never-touched pages
protected too without populating them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from livemig.memtrack.base import TrackerBase
from livemig.memtrack.pagemap import (
    PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    PagemapScanner,
)
from livemig.memtrack.uffd import (
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFDIO_REGISTER_MODE_WP,
    Userfaultfd,
    supported_features,
)

REQUIRED_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM


def wanted_features() -> int:
    """Required features plus WP_UNPOPULATED when this kernel offers it."""
    return REQUIRED_FEATURES | (supported_features() & UFFD_FEATURE_WP_UNPOPULATED)


class AsyncWPTracker(TrackerBase):
    """Dirty tracking with no user-space work per guest write."""

    name = "uffd-wp-async"

    def __init__(self, regions: Iterable[Any]) -> None:
        super().__init__(regions)
        self._uffd: Userfaultfd | None = None
        self._scanner: PagemapScanner | None = None

    def _start(self) -> None:
        uffd = Userfaultfd(wanted_features())
        scanner = None
        try:
            scanner = PagemapScanner()
            for r in self.regions:
                uffd.register(r.host_addr, r.length, UFFDIO_REGISTER_MODE_WP)
                uffd.writeprotect(r.host_addr, r.length, True)
        except BaseException:
            if scanner is not None:
                scanner.close()
            uffd.close()
            raise
        self._uffd, self._scanner = uffd, scanner

    def _sync_guest(self) -> dict[str, np.ndarray]:
        assert self._scanner is not None
        flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        return {
            r.name: self._scanner.scan_bitmap(r.host_addr, r.length, PAGE_IS_WRITTEN, flags)
            for r in self.regions
        }

    def _stop(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None
        if self._uffd is not None:
            # Closing the fd unregisters the ranges; protected pages become writable again.
            self._uffd.close()
            self._uffd = None
