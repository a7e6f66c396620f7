//! What travels: the one internal packet model every protocol version decodes into, the codec
//! that alone knows the bytes on the wire, topic names and filters, and the application message
//! as it is routed.

pub mod codec;
pub mod message;
pub mod packet;
pub mod topic;
