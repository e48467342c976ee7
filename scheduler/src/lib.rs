//! The shoal scheduler: which node holds which pieces, parent ranking and
//! origin leases. Not built yet (issue 5); `shoal scheduler` says so.
