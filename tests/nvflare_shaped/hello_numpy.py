"""The shape of NVIDIA FLARE's ``hello-numpy`` client script, ported by changing its import
line only (``nvflare.client`` -> ``flare_async.client``)."""

import copy

import numpy as np

import flare_async.client as flare


def train(input_arr):
    output_arr = copy.deepcopy(input_arr)
    # mock training with plus 1
    return output_arr + 1


def evaluate(input_arr):
    # mock evaluation metrics
    return {"accuracy": float(np.mean(input_arr))}


def main():
    flare.init()

    sys_info = flare.system_info()
    print(f"system info is: {sys_info}", flush=True)

    while flare.is_running():
        input_model = flare.receive()
        print(f"current_round={input_model.current_round}")

        input_numpy_array = input_model.params["numpy_key"]
        output_numpy_array = train(input_numpy_array)
        metrics = evaluate(input_numpy_array)
        flare.log("accuracy", metrics["accuracy"], step=input_model.current_round)

        sys_info = flare.system_info()
        print(f"system info is: {sys_info}", flush=True)
        print(f"finish round: {input_model.current_round}", flush=True)

        flare.send(
            flare.FLModel(
                params={"numpy_key": output_numpy_array},
                params_type="FULL",
                metrics=metrics,
                current_round=input_model.current_round,
            )
        )


if __name__ == "__main__":
    main()
