"""The shape of NVIDIA FLARE's ``hello-pt`` client script (a PyTorch model, a train loop, an
evaluation for model selection, TensorBoard-style tracking), ported by changing its import
lines only (``nvflare.client`` -> ``flare_async.client``). The data: scikit-learn's digits,
split between the sites (nothing downloaded)."""

import torch
from torch import nn, optim

import flare_async.client as flare
from flare_async.client.tracking import SummaryWriter
from tests.nvflare_shaped.net import SimpleNetwork, site_data

batch_size = 32
epochs = 1
lr = 0.05


def evaluate(net, loader):
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            predicted = torch.argmax(net(images), 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    net.train()
    return correct / total


def main():
    model = SimpleNetwork()
    device = "cpu"
    loss = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    flare.init()
    sys_info = flare.system_info()
    client_name = sys_info["site_name"]
    train_loader, test_loader = site_data(flare.get_config(), batch_size)

    summary_writer = SummaryWriter()
    while flare.is_running():
        input_model = flare.receive()
        print(f"\n[Current Round={input_model.current_round}, Site = {client_name}]\n")

        model.load_state_dict(input_model.params)
        model.to(device)

        # evaluate the global model it received, for the server's model selection
        accuracy = evaluate(model, test_loader)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
            continue

        steps = epochs * len(train_loader)
        for epoch in range(epochs):
            running_loss = 0.0
            for i, batch in enumerate(train_loader):
                images, labels = batch[0].to(device), batch[1].to(device)
                optimizer.zero_grad()

                predictions = model(images)
                cost = loss(predictions, labels)
                cost.backward()
                optimizer.step()

                running_loss += cost.cpu().detach().numpy() / images.size()[0]
                if i % 10 == 9:
                    global_step = input_model.current_round * steps + epoch * len(train_loader) + i
                    summary_writer.add_scalar(
                        tag="loss_for_each_batch", scalar=running_loss, global_step=global_step
                    )
                    running_loss = 0.0

        print("Finished Training")

        output_model = flare.FLModel(
            params=model.cpu().state_dict(),
            metrics={"accuracy": accuracy},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
        flare.send(output_model)


if __name__ == "__main__":
    main()
