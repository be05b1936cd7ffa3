//! RetinaNet (Lin et al. 2017) as torchvision's detection package builds it:
//! one file per concern, parameter names equal to torchvision's state_dict.

pub mod anchors;
pub mod box_coder;
pub mod fpn;
pub mod head;
pub mod postprocess;
pub mod resnet;
pub mod retinanet;
pub mod weights;
