"""A class whose training methods are ordinary: the positive control of the typing test."""


class TrainableThing:
    def requires_grad_(self, requires_grad: bool = True) -> "TrainableThing":
        return self

    def backward(self) -> None:
        return None
