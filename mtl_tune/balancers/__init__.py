"""Balancers: methods that combine K task losses or gradients into one update.

``get_balancer(name, n_tasks, **hparams)`` builds one by its registry name, after checking every
hyperparameter's type and finiteness (:class:`HyperparameterError`, a ``ValueError``; see
:mod:`mtl_tune.balancers._hparams`); ``available_balancers()`` lists the names.
See :mod:`mtl_tune.balancers.base`.
"""

from mtl_tune.balancers._hparams import HyperparameterError
from mtl_tune.balancers.base import (Balancer, BalancerError, EpochInfo, ForwardOutput, GradientBalancer,
                                     LossBalancer, StepInfo)
from mtl_tune.registry import available_balancers, balancer_class, get_balancer

__all__ = ["Balancer", "BalancerError", "EpochInfo", "ForwardOutput", "GradientBalancer", "HyperparameterError",
           "LossBalancer", "StepInfo", "available_balancers", "balancer_class", "get_balancer"]
