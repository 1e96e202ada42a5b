//! The kubelet credential provider (issue 5): request in, response out, as pure functions.
