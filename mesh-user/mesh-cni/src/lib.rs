//! `mesh-cni`: the chained CNI plugin that hands each new pod to the node's meshd before the
//! pod's containers start ([`plugin`]), and the wire it speaks with the agent ([`wire`]), which
//! the agent's socket server shares. Installed as `/opt/cni/bin/mesh-cni` and chained last in
//! the node's conflist as `{"type": "mesh-cni"}`; see [`plugin::NetConf`] for its fields.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod plugin;
pub mod wire;
