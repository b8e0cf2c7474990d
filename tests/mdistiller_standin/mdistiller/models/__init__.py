from .cifar import cifar_model_dict
from .imagenet import imagenet_model_dict

__all__ = ["cifar_model_dict", "imagenet_model_dict"]
