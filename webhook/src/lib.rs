//! The image-rewrite admission webhook (issue 5): the pure decision over an AdmissionReview
//! and the HTTPS server around it.
