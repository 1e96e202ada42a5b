//! The Connector Kubernetes API (`connectors.alauda.io`): the CRD's types and its YAML
//! ([`crd`]), and the RBAC rule for using a connector, asked of the API server by
//! SubjectAccessReview ([`authz`]). The controller serves both; the webhook asks the same rule
//! when it admits a pod.

pub mod authz;
pub mod crd;
